"""A label store, opened: creating, resuming and appending it, writing shards, packing rounds and
reading them back. Its schema (arrays, encoding, the packed objects' layout) is schema.py's; its
checks and repairs are integrity.py's, the messages naming what differs from a command or dataset
mismatch.py's. Every file or object is read and written through objects.py's objects, so a store
is written to S3 as to disk.
"""
from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import zarr
from filelock import FileLock

from ..config import command_args
from ..errors import MealV2Error
from .faults import fault_point
from .integrity import StoreIntegrity, array_meta, check_metadata
from .lease import Lease, hold_lease, watch_lease, writable_url
from .locks import hold_lock, lock_path_beside
from .mismatch import path_differences, settings_differences
from .objects import LocalObjects, is_url, open_objects
from .schema import (ADDED_MARKS, ARRAYS, ARRAYS_KEY, ATTR_KEY, DATA_ARRAYS, DIGEST_KEY, FORMAT, LAYERS_DIGEST_KEY,
                     LAYERS_KEY, PROB_LEVELS, ROUND_ARRAYS, SHARD_ARRAYS, STAGED, STAGED_ARRAYS, VERSION, StoreError,
                     added_layer_arrays, array_meta_digest, array_specs, chunk_key, identity_digest, join_chunks,
                     json_digest, layer_arrays, layer_specs, num_shards, per_round, writable, write_paths)

RUNS_KEY = "mealv2_runs"   # what each labelling command took (record_run): history, outside the digest


@dataclass
class RoundData:
    """One label round in RAM: everything stage 2 needs for an epoch."""

    boxes: np.ndarray   # (N, C, 4) uint16
    flips: np.ndarray   # (N, C) uint8
    ids: np.ndarray     # (N, C, k) uint16
    probs: np.ndarray   # (N, C, k + 1) uint8: top-k codes, then the leftover mass's (common/data/targets.py)
    layers: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)   # layer: its (ids, probs), as read

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.boxes, self.flips, self.ids, self.probs,
                                      *(a for layer in self.layers.values() for a in layer)))


class LabelStore(StoreIntegrity):
    """Open store; use :meth:`create_or_resume` to write and :meth:`open` to read."""

    fsync = True   # make each shard durable before its done mark; False only to measure what that costs
    repairs: list[str] = []   # what create_or_resume repaired

    def __init__(self, path: Path, group: zarr.Group, objects=None):
        self.objects = objects or LocalObjects(path)   # the store's files, or a URL's objects (objects.py)
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
        if group.attrs.get(DIGEST_KEY) != json_digest(attrs):
            raise StoreError(f"{path}/zarr.json: the '{ATTR_KEY}' attributes were edited after the "
                             f"store was made (SHA-256 does not match); the store cannot be trusted")
        layers = group.attrs.get(LAYERS_KEY, [])
        if group.attrs.get(LAYERS_DIGEST_KEY, json_digest([])) != json_digest(layers):
            raise StoreError(f"{path}/zarr.json: the '{LAYERS_KEY}' attribute (its per-teacher layers) was edited "
                             f"after they were made (SHA-256 does not match); the layers cannot be trusted")
        check_metadata(objects, group.attrs.get(ARRAYS_KEY) or {}, attrs["rounds_planned"],
                       [name for j, layer in enumerate(layers) for name in _with_staged(_record_arrays(j, layer))])
        return cls(path, group, objects)

    @classmethod
    def create_or_resume(cls, path: str | Path, attrs: dict, rounds: int, labels: np.ndarray,
                         before_growing=None, relpaths: Sequence[str] | None = None, *,
                         layers: Sequence[dict] = (), guard=None) -> "LabelStore":
        """Make a new store, or reopen one made by the same teachers, data and crop settings.

        ``rounds`` larger than the store's plan appends rounds, once ``before_growing(store)``
        (the caller's last checks) has returned: a refused command leaves the store as it was.
        Smaller shrinks the plan back, down to the rounds already complete, never below. Call
        on one process only (rank 0); the others :meth:`open` it afterwards in mode ``r+``.
        ``relpaths``: the dataset's image paths, kept to name the files of a changed dataset. ``layers``:
        the teachers' records (``attrs["teachers"]``) whose own top-k a new store keeps beside the ensemble's
        (``--keep-teachers``); a store is resumed only by a command keeping the layers it keeps.
        A resumed store is repaired first (:meth:`repair`; ``repairs`` says what was), then its
        labelled rounds are packed (:meth:`pack`). ``guard`` (a lease's ``check``) is the store's from
        before the first of those writes, and checked before each commit among them.
        """
        objects = open_objects(path)
        path = objects.location
        attrs = _stamped(attrs)
        if objects.exists("zarr.json"):
            store = cls.open(path, mode="r+")
            store.guard = guard   # before any write of the resume: repair, pack, resize, deletions
            store.check_resumable(attrs, keeps_layers=bool(layers), relpaths=relpaths)
            store.repairs = store.repair(labels, relpaths)   # before anything reads the done marks
            store.pack()   # rounds a killed run labelled in full but did not pack
            store.check_rounds(rounds)
            if rounds > store.rounds_planned and before_growing is not None:
                before_growing(store)
            if rounds != store.rounds_planned or store.group[f"{STAGED}/done"].shape[0] != store.rounds_planned:
                store._resize(rounds)   # or a resize was cut short
            return store
        store = cls._create(objects, attrs, rounds, labels, relpaths, layers, guard)
        store.guard = guard
        return store

    def check_resumable(self, attrs: dict, *, keeps_layers: bool, relpaths: Sequence[str] | None = None) -> None:
        """Refuse a labelling command whose ``attrs`` (teachers, data, crop settings) differ from the store's, or
        that keeps per-teacher layers where the store does not (or the reverse): resuming would mix labels.
        Reads only, so a dry run gives the refusal the run would."""
        attrs = _stamped(attrs)
        problems = settings_differences(self.attrs, attrs)
        if any(p.startswith("dataset.") for p in problems) and relpaths is not None:
            problems.append(self.dataset_changes(relpaths))
        kept = bool(self.layers_with_ensemble())
        if kept != keeps_layers:
            problems.append(f"--keep-teachers: the store {'keeps' if kept else 'has no'} per-teacher layers, this "
                            f"command {'does not keep them' if kept else 'keeps them'}")
        if problems:
            raise StoreError(f"{self.path} was made with other settings; refusing to mix labels:\n  "
                             + "\n  ".join(problems)
                             + "\nUse a new --out, or the settings the store was made with.")

    def check_rounds(self, rounds: int) -> None:
        """Refuse ``--rounds`` that would drop complete rounds, or grow a store with an added layer (which would
        not cover the new rounds)."""
        planned, complete = self.rounds_planned, self.rounds_complete()
        if rounds < complete:
            raise StoreError(f"{self.path}: store plans {planned} rounds, --rounds {rounds} would drop some of its "
                             f"{complete} complete rounds; pass --rounds {complete} (or more, to append)")
        if rounds > planned and (added := self.added_layers()):
            raise StoreError(f"--rounds {rounds}: {self.path} has {planned} rounds and a layer added by --add-teacher "
                             f"({self.layers[added[0]]['teacher']['spec']}), which would not cover new rounds; "
                             f"pass --rounds {planned}, or label into a new --out")

    @classmethod
    def _create(cls, objects, attrs: dict, rounds: int, labels: np.ndarray,
                relpaths: Sequence[str] | None, layers: Sequence[dict] = (), guard=None) -> "LabelStore":
        attrs = {**attrs, "rounds_planned": rounds}
        tmp = objects.build_folder()
        shutil.rmtree(tmp, ignore_errors=True)
        group = zarr.open_group(zarr.storage.LocalStore(tmp), mode="w")
        group.create_group(STAGED)
        specs = array_specs(images=attrs["dataset"]["num_images"], crops=attrs["crops_per_image"],
                            topk=attrs["topk"], classes=len(attrs["classes"]), shard_size=attrs["shard_size"],
                            rounds=rounds)
        for name, spec in [*specs.items(), *(item for j in range(len(layers)) for item in layer_specs(specs, j).items())]:
            group.create_array(name, **spec)
        writable(group["labels"])[:] = labels
        if relpaths is not None:
            write_paths(group, relpaths)
        named = [*ARRAYS, *(name for j in range(len(layers)) for name in _with_staged(layer_arrays(j)))]
        arrays = {name: array_meta_digest(name, array_meta(LocalObjects(tmp), name)) for name in named if name in group}
        records = [{"teacher": teacher, "marks": "ensemble"} for teacher in layers]
        group.attrs.update({ATTR_KEY: attrs, DIGEST_KEY: json_digest(attrs), ARRAYS_KEY: arrays,
                            **({LAYERS_KEY: records, LAYERS_DIGEST_KEY: json_digest(records)} if records else {})})
        try:
            if guard is not None:
                guard()
            objects.publish(tmp)   # the store appears under its name only once complete and durable
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(objects.location, mode="r+")

    def _resize(self, rounds: int) -> None:
        """Plan ``rounds`` rounds. Growing resizes the arrays, then records the plan; shrinking
        records the plan, then drops the rounds past it. Either way a kill in between leaves a
        store whose plan its arrays hold, completed by the next command (a round's labels are a
        pure function of the seed, so chunks left of a dropped round are still its labels)."""
        def arrays():
            names = (*ROUND_ARRAYS, *(n for n in STAGED_ARRAYS if per_round(n)), *_with_staged(self.layer_data))
            for name in names:
                arr = self.group[name]
                arr.resize((rounds, *arr.shape[1:]))
                fault_point("append")
            self._sync_meta(*names)   # before a grown plan is recorded

        def plan():
            self.attrs["rounds_planned"] = rounds
            self._update_attrs({ATTR_KEY: self.attrs, DIGEST_KEY: json_digest(self.attrs)})

        for step in (arrays, plan) if rounds > self.rounds_planned else (plan, arrays):
            self._check_guard()
            step()

    def _update_attrs(self, values: dict) -> None:
        """Update the store's attributes, durably: zarr replaces its zarr.json by a rename but syncs nothing,
        and a power cut could take back a plan or a layer the arrays already hold."""
        self.group.attrs.update(values)
        self._sync_meta("")

    def _sync_meta(self, *names: str) -> None:
        """Make the metadata zarr rewrote for arrays or groups ``names`` ("": the store's) durable, in one batch."""
        if self.fsync:
            self.objects.sync([f"{name}/zarr.json".lstrip("/") for name in names])

    @property
    def digest(self) -> str:
        """SHA-256 of the store's attributes: what it was made from and how; a published copy's is its
        original's (schema.identity_digest)."""
        return identity_digest(self.attrs, self.group.attrs[DIGEST_KEY])

    def grown_from(self, digest: str | None) -> int | None:
        """The rounds this store had when its digest was ``digest``, if it is that store with rounds appended
        since (an append changes only ``rounds_planned`` among the attributes and keeps every earlier round
        byte for byte); None for another store."""
        return next((r for r in range(1, self.rounds_planned)
                     if json_digest({**self.attrs, "rounds_planned": r}) == digest), None)

    def record_run(self, run: dict) -> None:
        """Add ``run`` (what a labelling command took: crops, seconds, device) to the attribute
        ``mealv2_runs``. It is history, not what the labels are, so it stays outside the digest: a resumed
        store keeps an uninterrupted one's digest, and runs trained from it their resume check."""
        self._check_guard()
        self._update_attrs({RUNS_KEY: [*self.runs(), run]})

    def runs(self) -> list[dict]:
        """The labelling runs recorded, oldest first; none in a store made before they were."""
        return list(self.group.attrs.get(RUNS_KEY, []))

    # ---- per-teacher layers (schema.LAYERS_KEY) ------------------------------------------
    @property
    def layers(self) -> list[dict]:
        """The per-teacher layers' records, layer j's arrays ``teachers/j/ids`` and ``teachers/j/probs``;
        none in a store labelled without ``--keep-teachers``."""
        return list(self.group.attrs.get(LAYERS_KEY, []))

    def add_layer(self, record: dict) -> int:
        """Append an added layer (``record``: {"teacher": ..., "marks": ADDED_MARKS, ...}; ``label --add-teacher``):
        make its arrays (the ensemble's ``ids``/``probs``/``done`` specs, staged and packed), then record them and
        the layer in one attribute update, so a kill in between leaves arrays the next call overwrites. Returns
        its position. Touches no other array or attribute: the store's digest stays as it was."""
        j = len(self.layers)
        specs = array_specs(images=self.num_images, crops=self.attrs["crops_per_image"], topk=self.attrs["topk"],
                            classes=len(self.attrs["classes"]), shard_size=self.shard_size, rounds=self.rounds_planned)
        made = layer_specs(specs, j, ("ids", "probs", "done"))
        for name, spec in made.items():
            self.group.create_array(name, overwrite=True, **spec)
        self._sync_meta(*made)   # before the layer is recorded
        self.objects.refresh()
        arrays = {**self.group.attrs[ARRAYS_KEY],
                  **{name: array_meta_digest(name, array_meta(self.objects, name))
                     for name in _with_staged(added_layer_arrays(j))}}
        records = [*self.layers, record]
        self._update_attrs({ARRAYS_KEY: arrays, LAYERS_KEY: records, LAYERS_DIGEST_KEY: json_digest(records)})
        return j

    def layers_with_ensemble(self) -> list[int]:
        """The layers written with the ensemble's shards, under its done marks (``--keep-teachers``)."""
        return [j for j, layer in enumerate(self.layers) if layer["marks"] == "ensemble"]

    @property
    def layer_data(self) -> tuple[str, ...]:
        """The packed per-crop arrays of the layers written with the ensemble's shards."""
        return tuple(name for j in self.layers_with_ensemble() for name in layer_arrays(j))

    @property
    def data_arrays(self) -> tuple[str, ...]:
        """Every per-crop array a (round, shard) writes and a round packs: the ensemble's, then its layers'."""
        return (*DATA_ARRAYS, *self.layer_data)

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
    def done_mask(self, shards: Sequence[int] | None = None, marks: str = "done") -> np.ndarray:
        """(R, S) bool: which shards are labelled, staged or packed; (R, len(shards)) for ``shards`` only.
        Staged marks are read for the rounds not packed only (a finished store has none to read). ``marks``:
        whose, the ensemble's or an added layer's (``teachers/<j>/done``)."""
        done = self._marks(marks, shards)
        rows = np.flatnonzero(~done.all(axis=1))
        if len(rows):
            done[rows] |= self._marks(f"{STAGED}/{marks}", shards, rows)
        return done

    def packed(self, marks: str = "done") -> np.ndarray:
        """(R,) bool: the rounds packed into one object per array (their row of the main ``done``, or of an
        added layer's ``marks``)."""
        return self._marks(marks).all(axis=1)

    def readable_layers(self) -> list[int]:
        """The per-teacher layers every complete round holds: those kept with the ensemble, and the added ones
        finished (one its ``--add-teacher`` is still labelling is left out until that command finishes it)."""
        return [j for j, layer in enumerate(self.layers)
                if layer["marks"] != ADDED_MARKS or self.packed(added_layer_arrays(j)[-1]).all()]

    def added_layers(self) -> list[int]:
        """The layers added to a finished store (``--add-teacher``), each under its own done marks."""
        return [j for j, layer in enumerate(self.layers) if layer["marks"] == ADDED_MARKS]

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

    def write_shard(self, round_: int, shard: int, boxes, flips, ids, probs, crcs, names=None, layers=()) -> None:
        """Write one shard's data into the staged arrays, then mark it labelled (never the other way round).
        ``layers``: each per-teacher layer's (ids, probs), one per layer kept with the ensemble's.

        ``crcs`` are the CRC32C of the images' bytes as this round read them; a shard that
        another round already completed must have read the same bytes (``names``: the images'
        paths, to name a changed one)."""
        self._check_guard()   # no data written by a writer that lost the store, where it can tell
        a, b = self.shard_range(shard)
        crcs = np.asarray(crcs, dtype=np.uint32)
        if len(layers) != len(self.layers_with_ensemble()):
            raise StoreError(f"{self.path}: round {round_} shard {shard} comes with {len(layers)} per-teacher layers, "
                             f"the store keeps {len(self.layers_with_ensemble())}")
        keys = self._chunk_keys(round_, [shard])
        labelled = self.done_mask([shard]).any()     # R marks, not the whole array
        if labelled:
            changed = np.flatnonzero(self._crc_array()[a:b] != crcs)
            if len(changed):
                raise self.images_changed(a + changed, crcs[changed], names)
            keys = [key for key in keys if not key.startswith(f"{STAGED}/crc32c/")]   # kept as they are
        layer_values = [v for layer in layers for v in layer]
        self._stage_shard(round_, shard, [("boxes", boxes), ("flips", flips), ("ids", ids), ("probs", probs),
                                          *zip(self.layer_data, layer_values)], keys, "done", self.path,
                          crcs=None if labelled else crcs)

    def _stage_shard(self, round_: int, shard: int, arrays, keys: list[str], marks: str, what: str, *,
                     crcs: np.ndarray | None = None) -> None:
        """Write one shard's ``arrays`` ((name, values) pairs; first its images' ``crcs`` if given) into their
        staged arrays (``keys``: the chunk files), durable, then set its staged mark in ``marks`` (never the
        other way round); ``what``: what is written, for the refusal. The one way a shard is staged, the
        ensemble's and an added layer's."""
        a, b = self.shard_range(shard)
        writing = self.path
        try:
            self.objects.make_parents(keys, fsync=self.fsync)   # the new folders' entries durable too
            if crcs is not None:
                writable(self.group[f"{STAGED}/crc32c"])[a:b] = crcs
            for i, (name, values) in enumerate(arrays):
                writing = self.objects.where(f"{STAGED}/{name}")
                if i:
                    fault_point("chunk_write")     # some of the shard's arrays written, not all
                writable(self.group[f"{STAGED}/{name}"])[round_, a:b] = values
            writing = self.path
            if self.fsync:   # as a database before its commit record: a shard marked done has its data
                self.objects.sync(keys)
        except OSError as e:   # zarr's and fsync's errors often name no file
            raise StoreError(f"{e.filename or writing}: cannot write round {round_} shard {shard} of {what} "
                             f"({e.strerror or e}; {self.objects.free_space()}); "
                             f"free some space and re-run the same command: it resumes with this shard") from e
        fault_point("shard_mark")              # data written, shard not yet marked done
        done = writable(self.group[f"{STAGED}/{marks}"])   # opened first (at a URL, a read): the check, then one PUT
        self._check_guard()
        done[round_, shard] = 1   # not synced: a lost mark only redoes the shard

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
            self._pack_round(r, [*self.data_arrays, *([] if packed.any() else ["crc32c"])], "done")
            packed[r] = True
        # The staged chunks of packed rounds, found in one listing (at a URL, one request per 1,000 keys
        # instead of one per array and round): the folders `STAGED/ARRAY/c/ROUND` and `STAGED/crc32c/c`.
        staged = {"/".join(key.split("/")[:depth]) for key in self.objects.keys(STAGED) for depth in (3, 4, 5, 6)}
        leftovers = [f"{STAGED}/{name}/c/{r}" for r in np.flatnonzero(packed)
                     for name in (*ROUND_ARRAYS, *self.layer_data)]
        self._delete_staged([p for p in [*leftovers, *([f"{STAGED}/crc32c/c"] if packed.any() else [])]
                             if p in staged])
        return rounds

    def _pack_round(self, round_: int, names, marks: str) -> None:
        """Join round ``round_``'s staged chunks of arrays ``names`` into their objects, then commit the round
        by its row of ``marks``, durable before the staged files go: the ensemble's and an added layer's."""
        for name in names:
            self._pack_object(name, round_)
        fault_point("pack")                # objects written, round not committed
        commit = [chunk_key(marks, 2, round_, 0)]
        self.objects.make_parents(commit, fsync=self.fsync)
        done = writable(self.group[marks])   # opened before the check, so only the commit's PUT follows it
        self._check_guard()
        done[round_] = 1
        if self.fsync:                     # the staged files are deleted next
            self.objects.sync(commit)

    def _delete_staged(self, prefixes) -> None:
        """Delete the staged folders ``prefixes`` of committed rounds, each only while the store is still ours."""
        for prefix in prefixes:
            self._check_guard()   # a taker may be staging this round again
            self.objects.delete_tree(prefix)

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
        target = chunk_key(name, ndim, round_, 0)
        try:
            self.objects.write(target, join_chunks(parts), self.fsync)
        except OSError as e:
            raise StoreError(f"{self.objects.where(target)}: cannot pack round {round_} of {self.path} "
                             f"({e.strerror or e}; {self.objects.free_space()}, the object takes "
                             f"{sum(len(p) for p in parts) / 2**20:.1f} MiB); its shards are kept: free some space "
                             f"and re-run the same command, which packs it") from e

    def _crc_array(self) -> zarr.Array:
        """The images' CRC32Cs: packed with the first packed round, staged until then."""
        return self.group["crc32c" if self.packed().any() else f"{STAGED}/crc32c"]

    # ---- reading -----------------------------------------------------------------------
    def rounds_complete(self) -> int:
        """Number of leading rounds that are complete: every shard labelled and the round packed."""
        return leading(self.packed())

    def rounds_labelled(self) -> int:
        """Number of leading rounds every shard of which is labelled: the complete ones, and those a run labelled
        but did not pack (it packs its rounds as it ends: a killed run leaves them for the next to pack)."""
        return leading(self.done_mask().all(axis=1))

    @property
    def complete(self) -> bool:
        return self.rounds_complete() == self.rounds_planned

    def read_round(self, round_: int, layers: Sequence[int] = ()) -> RoundData:
        """Load one complete round into RAM in one read per array (one object each), with the per-teacher
        ``layers`` asked for."""
        if not self._marks("done")[round_].all():
            raise StoreError(f"{self.path}: round {round_} is not complete; finish it by re-running "
                             f"the same `mealv2 label` command")
        for j in layers:
            if self.layers[j]["marks"] == ADDED_MARKS and not self.packed(added_layer_arrays(j)[-1])[round_]:
                raise StoreError(f"{self.path}: {self.layer_name(j)} is not labelled for round {round_}; finish it "
                                 f"by re-running its command:\n  {self.add_teacher_command(j)}")
        missing = self.missing_chunks(round_, layers)
        if missing:
            raise StoreError(f"{self.path}: chunk files missing although marked done: {missing[:5]}")
        g = self.group
        return RoundData(boxes=g["boxes"][round_], flips=g["flips"][round_], ids=g["ids"][round_],
                         probs=g["probs"][round_],
                         layers={j: tuple(g[name][round_] for name in layer_arrays(j)) for j in layers})

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
        return path_differences(self.relpaths(), relpaths, show)

    def crcs(self) -> np.ndarray:
        """(N,) uint32: CRC32C of each image's bytes when it was labelled."""
        return self._crc_array()[:]

    def changed_images(self, crcs: np.ndarray) -> np.ndarray:
        """Ids of the images whose bytes (``crcs``: every image's CRC32C) differ from those a completed
        round labelled."""
        labelled = np.repeat(self.done_mask().any(axis=0), self.shard_size)[:self.num_images]
        return np.flatnonzero(labelled & (self.crcs() != np.asarray(crcs, dtype=np.uint32)))

    def images_changed(self, ids: np.ndarray, crcs: np.ndarray, names=None,
                       fix: str = "Restore the images, or label into a new --out") -> StoreError:
        """The refusal of images ``ids`` (now ``crcs``) changed since labelled, by path when ``names``; ``fix``:
        what to do about it, as the command at hand can."""
        stored = self._crc_array().get_coordinate_selection(np.asarray(ids, dtype=np.int64))
        first = [f"{names[i] if names is not None else f'image {i}'} (CRC32C {crc:08x}, the store has {old:08x})"
                 for i, crc, old in list(zip(ids, crcs, stored))[:5]]
        return StoreError(f"{self.path}: {len(ids)} image(s) changed since earlier rounds were labelled: "
                          + ", ".join(first) + (", ..." if len(ids) > 5 else "")
                          + f"; labels of one image must describe one set of pixels. {fix}")

    def _object_keys(self, round_: int, names=None) -> list[str]:
        return [chunk_key(name, self.group[name].ndim, round_, 0) for name in names or self.data_arrays]

    def _chunk_keys(self, round_: int, shards) -> list[str]:
        """The staged chunk files of (round, shard) for ``shards``, array by array."""
        ndims = {name: len(self.group[name].shape) for name in (*SHARD_ARRAYS, *self.layer_data)}   # one read each
        return [chunk_key(f"{STAGED}/{name}", ndim, round_, int(s)) for name, ndim in ndims.items() for s in shards]

    def bytes_on_disk(self) -> int | None:
        """The store's bytes; None for a URL whose host cannot list its objects."""
        return self.objects.size()

    def data_bytes(self) -> int | None:
        """Bytes of the objects and staged chunk files of the per-crop arrays, every layer's (what bytes-per-crop
        figures divide); the arrays' few-hundred-byte zarr.json metadata files and an added layer's done marks are
        not counted. None as bytes_on_disk."""
        layers = (name for j in range(len(self.layers)) for name in layer_arrays(j))
        sizes = [self.array_bytes(name) for name in (*DATA_ARRAYS, *layers)]
        return None if None in sizes else sum(sizes)

    def array_bytes(self, name: str) -> int | None:
        """Bytes of the objects and staged chunk files of per-crop array ``name``; None as bytes_on_disk."""
        sizes = [self.objects.size(f"{where}{name}/c") for where in ("", f"{STAGED}/")]
        return None if None in sizes else sum(sizes)

    @property
    def label_settings(self) -> dict:
        """The settings of `mealv2 label` (LabelConfig's fields) the store was labelled with, as their flags take
        them: its rounds, crops, top-k, temperature, seed and shard size."""
        a, crop = self.attrs, self.attrs["crop"]
        return {"rounds": a["rounds_planned"], "crops_per_image": a["crops_per_image"], "res": crop["res"],
                "scale": tuple(crop["scale"]), "ratio": tuple(crop["ratio"]), "topk": a["topk"],
                "temperature": a["temperature"], "seed": a["seed"], "shard_size": a["shard_size"]}

    def label_command(self) -> str:
        """The `mealv2 label` command that makes this store as it is, from its attributes (printed by
        common.config.command_args): what repairs or completes it. DATA is the dataset it was made from;
        FILE_N the class names teacher N was labelled with, as the store records them (whether they came from
        a file, a checkpoint or timm is not recorded, and stating them gives the same teacher); a store this
        machine reads at a URL `label` cannot write is named STORE, to be run where it can be written."""
        a = self.attrs
        out, notes = self._out_for_label()
        named = {n: f"FILE_{n}" for n, t in enumerate(a["teachers"], 1) if t.get("output_classes") is not None}
        notes += [f"FILE_{n}: teacher {n}'s class names in output order, one per line (its output_classes in "
                  f"`mealv2 inspect {self.path} --json`)" for n in named]
        values = {"data": "DATA", "teachers": [t["spec"] for t in a["teachers"]], "out": out, **self.label_settings,
                  "skip_bad": bool(a["dataset"]["skipped"]) or None, "teacher_classes": named,
                  "teacher_precision": a["teacher_precision"], "keep_teachers": bool(self.layers_with_ensemble()) or None}
        return shlex.join(["mealv2", "label", *command_args(values)]) + "".join(f"\n  {note}" for note in notes)

    def add_teacher_command(self, layer: int) -> str:
        """The `mealv2 label --add-teacher` command that labels added layer ``layer``: what finishes or
        repairs it (DATA as in :meth:`label_command`; the layer's settings are the store's)."""
        teacher = self.layers[layer]["teacher"]
        out, notes = self._out_for_label()
        named = {1: "FILE_1"} if teacher.get("output_classes") is not None else {}
        notes += [f"FILE_1: the teacher's class names in output order, one per line (its output_classes in "
                  f"{self.name}/zarr.json's {LAYERS_KEY}, record {layer})"] if named else []
        values = {"data": "DATA", "add_teacher": teacher["spec"], "out": out, "teacher_classes": named,
                  "teacher_precision": self.layers[layer].get("teacher_precision")}
        return shlex.join(["mealv2", "label", *command_args(values)]) + "".join(f"\n  {note}" for note in notes)

    def _out_for_label(self) -> tuple[str, list[str]]:
        """The store as `mealv2 label --out` names it, and a note when that is STORE: a URL this machine reads
        but `label` cannot write, to be run where it can be written."""
        out = str(self.path)
        if is_url(out):
            try:
                writable_url(out, MealV2Error)
            except MealV2Error:
                return "STORE", [f"STORE: {out} where `mealv2 label` can write it: a local path or an s3:// URL "
                                 f"(it cannot write {urlsplit(out).scheme}:// URLs)"]
        return out, []

    def remove_partial_writes(self) -> int:
        """Delete temp files a killed writer left behind (zarr writes chunks via temp + rename)."""
        self._check_guard()
        return self.objects.remove_partials()


def _stamped(attrs: dict) -> dict:
    """A labelling command's store attributes with the format they are written in."""
    return {"format": FORMAT, "version": VERSION, "prob_levels": PROB_LEVELS, **attrs}


def leading(full: np.ndarray) -> int:
    """How many leading entries of the bool vector ``full`` (one per round) are true."""
    return int(np.argmin(full)) if not full.all() else len(full)


def _record_arrays(layer: int, record: dict) -> tuple[str, ...]:
    """The packed arrays of layer ``layer`` whose record is ``record``: an added layer has its done marks too."""
    return added_layer_arrays(layer) if record["marks"] == ADDED_MARKS else layer_arrays(layer)


def _with_staged(names) -> list[str]:
    """Arrays ``names`` and their staged twins."""
    return [f"{where}{name}" for name in names for where in ("", f"{STAGED}/")]


def acquire_writer_lock(path: str | Path, command: str = "label") -> FileLock | Lease:
    """Exclusive lock ``STORE.lock`` beside the store's real path for the one writing job, `mealv2
    COMMAND` (locks.py): not inside it, since a new store is made elsewhere and renamed into place.
    A store at a URL has its lease ``STORE.lease`` instead (lease.py), whose ``check`` is
    then the store's guard."""
    if is_url(path):
        return hold_lease(path, command, error=StoreError)
    return hold_lock(lock_path_beside(path), path, command, StoreError)


def writer_lock_share(lock: FileLock | Lease) -> tuple[str, float] | None:
    """What the other ranks of a job need to watch rank 0's lease (:func:`watch_writer_lock`): its token and
    duration; None for a file lock, which its holder cannot lose."""
    return (lock.token, lock.seconds) if isinstance(lock, Lease) else None


def watch_writer_lock(path: str, share: tuple[str, float] | None) -> Lease | None:
    """On a rank other than 0, rank 0's lease watched (``share``: :func:`writer_lock_share`'s); its ``check``
    is this rank's store guard, so a lost lease stops every rank before its next commit."""
    if share is None:
        return None
    token, seconds = share
    return watch_lease(path, "label", token, seconds=seconds, error=StoreError)
