"""A per-teacher layer added to a finished store (``label --add-teacher``), written as the labeller writes a
store: the same (round, shard) units, staged chunk files, done marks set after their data, rounds packed into
one object per array and committed by a row of done marks. Only the layer's own arrays (``teachers/<j>/ids``,
``probs``, ``done`` and their staged twins) are written; the ensemble's, the other layers' and the store's
attributes are read, never rewritten. It has the interface of a :class:`LabelStore` that the labeller's
``label_shards`` and :class:`~.writer.ShardWriter` use, so resuming and splitting across ranks are theirs.
"""
from __future__ import annotations

import numpy as np

from .label_store import LabelStore
from .schema import STAGED, StoreError, added_layer_arrays, chunk_key


class AddedLayer:
    """Layer ``layer`` of ``store``, one added by ``--add-teacher`` (its record's marks are its own)."""

    def __init__(self, store: LabelStore, layer: int):
        self.store, self.layer = store, layer
        self.ids, self.probs, self.marks = added_layer_arrays(layer)
        self.name, self.path = store.name, store.path
        self.rounds_planned, self.num_shards, self.id_dtype = store.rounds_planned, store.num_shards, store.id_dtype
        self.shard_range = store.shard_range
        self._boxes: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def crops(self, round_: int, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The boxes and flips of ``image_ids`` in ``round_`` as the store holds them (what the layer labels)."""
        if round_ not in self._boxes:   # a round's boxes are a few bytes per crop: read once
            self._boxes = {round_: (self.store.group["boxes"][round_], self.store.group["flips"][round_])}
        boxes, flips = self._boxes[round_]
        return boxes[image_ids], flips[image_ids].astype(bool)

    def done_mask(self) -> np.ndarray:
        """(R, S) bool: the layer's shards labelled, staged or packed."""
        return self.store.done_mask(marks=self.marks)

    def write_shard(self, round_: int, shard: int, boxes, flips, ids, probs, crcs, names=None, layers=()) -> None:
        """Write the layer's (ids, probs) of one shard into its staged arrays, then mark it. ``boxes``/``flips``
        are the crops labelled, which must be the store's; ``crcs`` the images' as read, which must be those the
        store was labelled from (``names``: their paths, to name a changed one)."""
        store, (a, b) = self.store, self.shard_range(shard)
        crcs = np.asarray(crcs, dtype=np.uint32)
        changed = np.flatnonzero(store.crcs()[a:b] != crcs)
        if len(changed):
            raise store.images_changed(a + changed, crcs[changed], names)
        if not (np.array_equal(boxes, store.group["boxes"][round_, a:b])
                and np.array_equal(np.asarray(flips, dtype=bool), store.group["flips"][round_, a:b].astype(bool))):
            raise StoreError(f"{store.path}: round {round_} shard {shard}: the crops labelled are not the store's; "
                             f"nothing was written")
        keys = [chunk_key(f"{STAGED}/{name}", store.group[name].ndim, round_, shard) for name in (self.ids, self.probs)]
        store._stage_shard(round_, shard, [(self.ids, ids), (self.probs, probs)], keys, self.marks,
                           f"{store.layer_name(self.layer)} of {store.path}")

    def pack(self) -> list[int]:
        """Pack each round whose shards are all labelled: the layer's staged chunks joined into its objects,
        committed by its row of done marks, then the staged files deleted (``LabelStore.pack``'s order)."""
        store = self.store
        store.objects.refresh()   # the shards other ranks wrote
        done = self.done_mask().all(axis=1)
        packed = store.packed(self.marks)
        rounds = [r for r in range(len(done)) if done[r] and not packed[r]]
        for r in rounds:
            store._pack_round(r, [self.ids, self.probs], self.marks)
            packed[r] = True
        staged = set(store.objects.keys(f"{STAGED}/{self.ids.rsplit('/', 1)[0]}"))
        prefixes = [f"{STAGED}/{name}/c/{r}" for r in np.flatnonzero(packed)
                    for name in (self.ids, self.probs, self.marks)]
        store._delete_staged([p for p in prefixes if any(key.startswith(p + "/") for key in staged)])
        return rounds

    @property
    def complete(self) -> bool:
        return bool(self.store.packed(self.marks).all())
