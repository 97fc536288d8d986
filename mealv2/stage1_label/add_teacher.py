"""`mealv2 label DATA --add-teacher SPEC --out STORE`: grow a finished store by one teacher's layer.

Only the new teacher runs, over the store's own crops (its boxes and flips, read back, rendered by the same
loaders as ``label``), at the store's temperature, top-k and encoding; its top-k is a per-teacher layer with
its own done marks (common/store/added_layer.py). The ensemble's labels, the layers before it and the store's
identity (its ``mealv2`` attributes and digest) are never rewritten, so every run trained from the store
replays and resumes as before. Resuming and splitting across ranks are the labeller's (``label_shards``).
"""
from __future__ import annotations

import dataclasses
import time

from ..common.config import flag_name, given, word
from ..common.data.dataset import build_index_shared, in_classes, skipped_report
from ..common.errors import MealV2Error
from ..common.models.distributed import distributed
from ..common.models.runtime import Runtime
from ..common.models.teachers import (Ensemble, load_teachers, read_classes_file, read_teacher_classes,
                                      teacher_table)
from ..common.store.added_layer import AddedLayer
from ..common.store.label_store import LabelStore, acquire_writer_lock, watch_writer_lock, writer_lock_share
from ..common.store.schema import ADDED_MARKS
from .config import LabelConfig
from .labeler import _check, label_shards, run_record, throughput


def store_settings(cfg: LabelConfig, store: LabelStore) -> LabelConfig:
    """``cfg`` with the store's rounds, crops, top-k, temperature, seed and shards: a layer is labelled as the
    store was. A setting given (not None) is refused unless it is the store's: taking the store's instead would
    label with another value than typed, without a word; the same value is taken, so a user's own `label`
    command, --teachers swapped for --add-teacher, runs as it is."""
    ours = store.label_settings
    differ = {name: value for name, value in given(cfg, ours).items() if word(value) != word(ours[name])}
    if differ:
        named = "; ".join(f"{flag_name(name)} {word(value)}, the store's is {word(ours[name])}"
                          for name, value in differ.items())
        raise MealV2Error(f"--add-teacher {cfg.add_teacher}: {store.path} was labelled with other settings "
                          f"({named}): a teacher's layer is labelled over the store's own crops with the store's "
                          f"settings; drop {' '.join(map(flag_name, differ))} (unset, they are the store's)")
    return dataclasses.replace(cfg, **ours)


def same_teacher(a: dict, b: dict) -> bool:
    """Whether two teachers' records name one teacher: the same spec, or the same architecture and weights."""
    return a["spec"] == b["spec"] or (a.get("sha256") is not None and (a["arch"], a["sha256"]) == (b["arch"], b["sha256"]))


def layer_to_resume(store: LabelStore, record: dict) -> int | None:
    """The position of the layer an earlier ``--add-teacher`` of teacher ``record`` began (to finish or repair;
    a sound finished one is left as it is), None for a teacher new to the store; refused for a teacher the store
    holds otherwise (in its ensemble, a kept layer, or added under another spec)."""
    for j in store.added_layers():
        held = store.layers[j]["teacher"]
        if held == record:
            return j
        if held["spec"] == record["spec"]:
            changed = "; ".join(f"{key} {str(held.get(key))[:40]} -> {str(value)[:40]}"
                                for key, value in record.items() if held.get(key) != value)
            raise MealV2Error(f"--add-teacher {record['spec']}: {store.path}'s {store.layer_name(j)} was labelled "
                              f"from this spec, which now loads another teacher ({changed}); finishing or repairing "
                              f"the layer with it would mix two teachers' labels: restore the teacher as it was, or "
                              f"give the new one under another path")
    for where, records in (("its ensemble", store.attrs["teachers"]),
                           ("its per-teacher layers", [layer["teacher"] for layer in store.layers])):
        if any(same_teacher(record, t) for t in records):
            raise MealV2Error(f"--add-teacher {record['spec']}: {store.path} already holds this teacher in {where} "
                              f"(`mealv2 inspect {store.path}` lists them); add another teacher, or train from its "
                              f"layer with `train --teacher-weights`")
    return None


def refuse_unfinished(store: LabelStore) -> None:
    if not store.complete:
        raise MealV2Error(f"--add-teacher: {store.path} is not finished ({store.rounds_complete()}/"
                          f"{store.rounds_planned} rounds complete): a teacher is added over a finished store's "
                          f"crops; finish it first with its own command:\n  {store.label_command()}")


def refuse_other_data(store: LabelStore, index, data: str) -> None:
    if index.fingerprint != store.attrs["dataset"]["fingerprint"]:
        raise MealV2Error(f"--add-teacher: DATA {data} is not the data {store.path} was labelled from (fingerprint "
                          f"{index.fingerprint}, the store's {store.attrs['dataset']['fingerprint']}): pass the "
                          f"store's dataset as DATA\n  " + store.dataset_changes(index.relpaths))


def run_add_teacher(cfg: LabelConfig) -> LabelStore:
    """Add teacher ``cfg.add_teacher``'s layer to the finished store ``cfg.out`` over DATA (``cfg.data``), as
    ``mealv2 label --add-teacher`` does; re-run after a kill, it resumes. Returns the store."""
    started = time.perf_counter()
    with distributed(cfg.device) as (info, device):
        say = print if info.is_main else (lambda *a, **k: None)
        store = LabelStore.open(cfg.out)
        refuse_unfinished(store)
        cfg = store_settings(cfg, store)
        index = build_index_shared(cfg.data, info, skip_bad=cfg.skip_bad or bool(store.attrs["dataset"]["skipped"]),
                                   workers=max(cfg.workers, 8), progress=cfg.progress and info.is_main)
        if skipped := skipped_report(index):
            say(skipped)
        refuse_other_data(store, index, cfg.data)
        classes = store.attrs["classes"]
        names = read_classes_file(cfg.classes_file) if cfg.classes_file else None
        teachers, mapped, _ = load_teachers([cfg.add_teacher], classes, cfg.crop.res, names,
                                            stated_classes=read_teacher_classes(cfg.teacher_classes, 1))
        if extra := [c for c in mapped if c not in classes]:
            raise MealV2Error(f"--add-teacher {cfg.add_teacher}: it has {len(extra)} classes the store lacks "
                              f"({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''}); a layer is over the "
                              f"store's {len(classes)} classes, which its crops were labelled in: add a teacher of "
                              f"those classes, or label a new store with this teacher among --teachers")
        if list(mapped) != list(classes):
            raise MealV2Error(f"--add-teacher {cfg.add_teacher}: its {len(mapped)} classes cannot be mapped onto the "
                              f"store's {len(classes)} ({', '.join(classes[:3])}, ...): give its class names in "
                              f"output order with --teacher-classes 1=FILE (or --classes FILE) naming the store's "
                              f"classes")
        say(teacher_table(teachers, cfg.crop.res, "store"))
        record = teachers[0].to_attrs()
        j = layer_to_resume(store, record)
        ensemble = Ensemble(teachers, Runtime(device, cfg.teacher_precision), cfg.temperature)
        checks = None
        if j is None:   # a layer being resumed was checked when it was begun
            in_space = in_classes(index, classes) if index.labelled else index
            checks = info.broadcast_object(_check(cfg, ensemble, in_space) if info.is_main else None)
            if isinstance(checks, MealV2Error):
                raise checks
        lock = acquire_writer_lock(cfg.out) if info.is_main else None
        watch = None   # rank 0's lease, as the other ranks watch it (as `label` does)
        try:
            if info.is_main:
                store = LabelStore.open(cfg.out, mode="r+")
                store.guard = getattr(lock, "check", None)   # from the first write: a lease can be lost
                store.remove_partial_writes()
                if j is not None:   # a kill or damage: exactly its missing and damaged shards are labelled
                    for line in store.repair_layer(j):
                        say(f"repair: {line}")
                else:
                    j = store.add_layer({"teacher": record, "marks": ADDED_MARKS,
                                         "teacher_precision": cfg.teacher_precision, "teacher_check": checks[0]})
            j, share = info.broadcast_object((j, writer_lock_share(lock)) if info.is_main else None)   # and a barrier
            if not info.is_main:
                store = LabelStore.open(cfg.out, mode="r+")
                watch = watch_writer_lock(cfg.out, share)
                store.guard = getattr(watch, "check", None)
            layer = AddedLayer(store, j)
            labelling = time.perf_counter()
            crops, seconds = label_shards(cfg, layer, index, ensemble, info, crops=layer.crops)
            info.barrier()
            labelled = int(info.all_sum([crops])[0])
            if info.is_main:
                layer.pack()
                if labelled:
                    store.record_run({**run_record(cfg, labelled, time.perf_counter() - labelling,
                                                   time.perf_counter() - started, device, info.world_size),
                                      "added_teacher": cfg.add_teacher})
        finally:
            for held in (watch, lock):
                if held is not None:
                    held.release()
        if info.is_main:
            print(f"mealv2 label --add-teacher: {throughput(crops, seconds, info)}; {store.path}: "
                  f"{store.layer_name(j)} {'complete' if layer.complete else 'not complete'}; train from it with "
                  f"`mealv2 train --labels {store.path} --teacher-weights " + ",".join(
                      "1" if i == j else "0" for i in range(j + 1)) + "`")
        return store
