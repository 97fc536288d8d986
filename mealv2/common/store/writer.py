"""The labeller's shard writer: shards are written on a thread while the teachers label the next ones.

Writing a shard (zarr's encoding, zstd, CRC32C, the chunk files, their fsync, then the done mark)
takes tens of milliseconds that a GPU labeller would otherwise spend idle. The writer keeps
``LabelStore.write_shard``'s order (a shard's data durable before its done mark) and writes one
shard after another, in the order they were handed over, so a kill loses only the shards queued
or being written, whose marks are unset: a resume labels them again. At most ``depth`` shards are
in flight, so a disk slower than the teachers makes the labeller wait instead of filling RAM. A
failed write stops the labeller at its next shard (or at the end), naming the store and the shard.
"""
from __future__ import annotations

import queue
import threading

from ..errors import MealV2Error
from .label_store import LabelStore, StoreError

DEPTH = 2   # shards in flight: one being written, one waiting; a kill loses at most these


class ShardWriter:
    """``with ShardWriter(store) as w: w.submit(round, shard, boxes, flips, ids, probs, crcs)``.

    ``depth`` 0 writes each shard in the caller's thread, as the labeller did before (what the
    background writer saves is measured against it: `mealv2 bench label`). ``names``: the images'
    paths, by which ``write_shard`` names a changed image."""

    def __init__(self, store: LabelStore, depth: int = DEPTH, *, names=None):
        if depth < 0:
            raise MealV2Error(f"shard writer depth {depth}: expected 0 (write in the loop) or more shards in flight")
        self.store, self.depth, self.names = store, depth, names
        self._slots = threading.Semaphore(max(depth, 1))
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"mealv2-writer:{store.name}") if depth else None

    def __enter__(self) -> "ShardWriter":
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, kind, error, tb) -> None:
        """Wait for the shards in flight (they are good work); a writer error is raised unless the
        caller is already raising one of its own."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
        if error is None:
            self._raise_if_failed()

    def submit(self, round_: int, shard: int, *arrays, layers=()) -> None:
        """Hand one complete shard over (``layers``: its per-teacher layers' (ids, probs)); blocks while
        ``depth`` shards are in flight."""
        self._raise_if_failed()
        if self._thread is None:
            self._write(round_, shard, arrays, layers)
            self._raise_if_failed()
            return
        self._slots.acquire()
        self._queue.put((round_, shard, arrays, layers))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:   # after a failure, drain without writing: resumes redo those shards
                self._write(*item)
            self._slots.release()

    def _write(self, round_: int, shard: int, arrays, layers=()) -> None:
        try:
            self.store.write_shard(round_, shard, *arrays, names=self.names, layers=layers)
        except MealV2Error as e:
            self._error = e
        except OSError as e:   # a full disk, a read-only or vanished store
            a, b = self.store.shard_range(shard)
            where = f" ({e.filename})" if e.filename else ""
            self._error = StoreError(
                f"{self.store.path}: writing round {round_} shard {shard} (images {a}-{b - 1}) failed: "
                f"{e.strerror or e}{where}. The shards marked done before it are kept: fix the cause (e.g. free "
                f"disk space) and re-run the same `mealv2 label` command to label the rest")
            self._error.__cause__ = e
        except BaseException as e:   # a bug: re-raised as is in the labeller's thread, traceback kept
            self._error = e

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
